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
//!
//! Queue groups (`SUB <pattern> queue=<name>`) are kept beside the plain
//! subscriptions, in an index of their own, and resolved into the same
//! cached route; a topic without groups pays one emptiness check for them.
//! Lossless subscribers (`SUB <pattern> lossless`) are kept apart in the
//! route too: their lines are never dropped, and a publisher that fills one
//! is stalled (its reader stops reading `send`) until it drains.
//! Retained messages (`RETAIN`) are a bounded map from topic to payload,
//! charged to the memory budget and replayed into a new subscription.

mod bus;
mod requests;
mod stage;

pub use bus::{is_bus_topic, ClientInfo, BUS_PREFIX};
pub use requests::MAX_PENDING_REQUESTS;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::outbox::{CloseReason, Outbox, Push};
use crate::acl::{Identity, Policy, Sub};
use crate::counters::{Counters, DropReason, TopicCounters};
use crate::protocol::{
    encode, Command, ErrorCode, Input, ProtocolError, PubRun, QueueName, SubOptions,
};
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
    /// Queue groups this client is a member of.
    queues: HashSet<GroupKey>,
    /// Those of `patterns` subscribed `lossless`: while there is one, the
    /// client's outbox is lossless.
    lossless: HashSet<Pattern>,
    who: Identity,
    /// Its requests and the ones it serves (`requests.rs`).
    req: requests::ClientRequests,
    /// Set once it is welcome (`bus.rs`): only then is it announced.
    info: Option<ClientInfo>,
    /// `echo=no` in its HELLO: its own messages are not delivered to it.
    no_echo: bool,
}

impl Client {
    /// Subscriptions held, plain and queue, for the limits.
    fn subscriptions(&self) -> usize {
        self.patterns.len() + self.queues.len()
    }
}

/// The argument text of every `SUB` `c` holds, with its options: plain,
/// `lossless`, and one per queue membership.
fn sub_texts(c: &Client) -> Vec<String> {
    let lossless = SubOptions {
        queue: None,
        lossless: true,
    };
    let mut out: Vec<String> = c
        .patterns
        .iter()
        .map(|p| {
            if c.lossless.contains(p) {
                crate::state::sub_text_with(p, &lossless)
            } else {
                crate::state::sub_text(p)
            }
        })
        .collect();
    out.extend(c.queues.iter().map(|(p, q)| {
        crate::state::sub_text_with(
            p,
            &SubOptions {
                queue: Some(q.clone()),
                lossless: false,
            },
        )
    }));
    out
}

/// A queue group is its pattern and its name: members that subscribed the
/// same pattern under the same name share its messages.
type GroupKey = (Pattern, QueueName);
type GroupId = u64;

struct Group {
    key: GroupKey,
    /// In the order they joined.
    members: Vec<ClientKey>,
    /// Where the round robin goes on; kept across route rebuilds so that a
    /// change of interest elsewhere does not send the next message to the
    /// first member again.
    cursor: Arc<AtomicUsize>,
}

/// A queue group as a route sees it: the members that may receive the topic.
#[derive(Clone)]
struct QueueRoute {
    members: Arc<[Arc<Outbox>]>,
    cursor: Arc<AtomicUsize>,
}

/// `--max-retained` and `--max-retained-bytes`: what `RETAIN` may make the
/// broker keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainLimits {
    pub messages: usize,
    pub bytes: usize,
}

impl Default for RetainLimits {
    fn default() -> Self {
        RetainLimits {
            messages: 10_000,
            bytes: 16 << 20,
        }
    }
}

/// What one retained message costs against the limits and the budget:
/// topic, payload, and the map entry.
fn retained_cost(topic: &Topic, payload: &[u8]) -> usize {
    topic.as_bytes().len() + payload.len() + super::outbox::RUN_COST
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
    /// Queue groups matching the topic (usually none: no allocation).
    groups: Box<[QueueRoute]>,
    /// Subscribers with a lossless outbox (not in `subscribers`), with
    /// their uid: they may stall only their own user's publishers.
    lossless: Box<[(Arc<Outbox>, u32)]>,
}

/// The lossless subscribers one command filled, whose publisher stalls;
/// and who that publisher is.
#[derive(Default)]
struct Stalls {
    /// `None`: a publish not made for a client (tests, benchmarks).
    uid: Option<u32>,
    full: Vec<Arc<Outbox>>,
    /// The publisher's own outbox when it asked for `echo=no`: delivery
    /// passes it over. Set for one command only, so that nothing else the
    /// router publishes (`_bus.` presence, replies) is kept from it.
    own: Option<Arc<Outbox>>,
}

pub struct RouterCore {
    index: PatternIndex<ClientKey>,
    clients: FastMap<ClientKey, Client>,
    /// Hashed with foldhash: one lookup per PUB, on the hot path.
    cache: FastMap<Topic, Route>,
    scratch: Vec<ClientKey>,
    /// Where `MSG` lines are encoded (once per message, into a reused
    /// buffer) and a batch's deliveries wait to be queued per outbox.
    stage: stage::Stage,
    counters: Arc<Counters>,
    /// Per-topic counters outlive the match cache, so a topic is resolved
    /// once however often interest changes. Folded topics are not kept:
    /// ever-new topic names must not grow this map without bound.
    topics: FastMap<Topic, Arc<TopicCounters>>,
    policy: Arc<Policy>,
    per_user: FastMap<u32, PerUser>,
    /// `--max-subscriptions`: per client, whatever the policy.
    max_subscriptions: usize,
    /// What all subscriptions cost, by [`subscription_cost`]: charged to the
    /// memory budget like backlogs, and held to half of it.
    subscription_bytes: usize,
    /// Durable state (`crate::state`): clients whose subscriptions changed
    /// since the state writer last took them, and how to wake it. `None`
    /// when nothing is kept on disk (unit tests, benchmarks).
    durable: Option<Durable>,
    group_index: PatternIndex<GroupId>,
    groups: FastMap<GroupId, Group>,
    group_ids: FastMap<GroupKey, GroupId>,
    next_group: GroupId,
    group_scratch: Vec<GroupId>,
    /// Queue memberships in force, for the subscription gauge.
    queue_members: usize,
    /// The last retained payload per topic (copied out of the read buffer).
    retained: FastMap<Topic, Bytes>,
    retained_bytes: usize,
    retain_limits: RetainLimits,
    /// Clients holding a lossless subscription.
    lossless_clients: HashSet<ClientKey>,
    /// Lossless outboxes the current command filled: its publisher stalls.
    stalls: Stalls,
    /// Set while [`RouterCore::adopt`] subscribes: no retained messages.
    replaying: bool,
    requests: requests::Requests,
}

/// What one subscription costs the broker beyond its pattern's text: its
/// entries in the client's set and in the pattern index, and the index
/// nodes (measured: 412 bytes resident per subscription for 100,000
/// distinct patterns of about 10 bytes, `fifobus bench --only memory`).
const SUBSCRIPTION_OVERHEAD: usize = 400;

/// The memory a subscription to `p` is counted for.
fn subscription_cost(p: &Pattern) -> usize {
    SUBSCRIPTION_OVERHEAD + p.as_str().len()
}

struct Durable {
    dirty: HashSet<ClientKey>,
    /// The retained messages changed.
    retained: bool,
    changed: Arc<tokio::sync::Notify>,
}

impl RouterCore {
    /// A router that counts into `counters`.
    pub fn new(counters: Arc<Counters>) -> Self {
        RouterCore {
            index: PatternIndex::default(),
            clients: FastMap::default(),
            cache: FastMap::default(),
            scratch: Vec::new(),
            stage: stage::Stage::default(),
            counters,
            topics: FastMap::default(),
            policy: Arc::new(Policy::open()),
            per_user: FastMap::default(),
            max_subscriptions: MAX_SUBSCRIPTIONS,
            subscription_bytes: 0,
            durable: None,
            group_index: PatternIndex::default(),
            groups: FastMap::default(),
            group_ids: FastMap::default(),
            next_group: 0,
            group_scratch: Vec::new(),
            queue_members: 0,
            retained: FastMap::default(),
            retained_bytes: 0,
            retain_limits: RetainLimits::default(),
            lossless_clients: HashSet::new(),
            stalls: Stalls::default(),
            replaying: false,
            requests: requests::Requests::default(),
        }
    }

    /// Tracks which clients' subscriptions change, waking `changed` when
    /// the first change after a [`RouterCore::take_dirty`] happens. On the
    /// command path this costs a set insert; the files are written by the
    /// state writer, coalesced.
    pub fn track_changes(&mut self, changed: Arc<tokio::sync::Notify>) {
        self.durable = Some(Durable {
            dirty: HashSet::new(),
            retained: false,
            changed,
        });
    }

    /// The clients whose subscriptions changed since the last call, each
    /// with the argument text of every `SUB` it now holds, and the retained
    /// messages if they changed.
    pub fn take_dirty(&mut self) -> crate::state::Dirty {
        let Some(d) = &mut self.durable else {
            return crate::state::Dirty::default();
        };
        let keys = std::mem::take(&mut d.dirty);
        let retained = std::mem::take(&mut d.retained).then(|| {
            let mut all: crate::state::Retained = self
                .retained
                .iter()
                .map(|(t, p)| (t.clone(), p.clone()))
                .collect();
            all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            all
        });
        let clients = keys
            .into_iter()
            .filter_map(|k| Some((k, sub_texts(self.clients.get(&k)?))))
            .collect();
        crate::state::Dirty { clients, retained }
    }

    /// The argument text of every `SUB` client `key` holds (durable state),
    /// options included.
    pub fn subscription_texts(&self, key: ClientKey) -> Vec<String> {
        self.clients.get(&key).map_or_else(Vec::new, sub_texts)
    }

    /// Fills the retained messages a previous broker left (before any
    /// client is adopted or accepted), within `--max-retained`,
    /// `--max-retained-bytes` and the memory budget, as `RETAIN` would.
    /// Returns a description of each message left out, for the log.
    pub fn load_retained(&mut self, msgs: crate::state::Retained) -> Vec<String> {
        let mut left_out = Vec::new();
        for (topic, payload) in msgs {
            let cost = retained_cost(&topic, &payload);
            let budget = &self.counters.memory;
            let why = if self.retained.contains_key(&topic) {
                Some("given twice")
            } else if self.retained.len() >= self.retain_limits.messages {
                Some("over --max-retained")
            } else if self.retained_bytes + cost > self.retain_limits.bytes {
                Some("over --max-retained-bytes")
            } else if budget.held() + cost > budget.limit() {
                Some("over the memory budget (--max-memory)")
            } else {
                None
            };
            if let Some(why) = why {
                left_out.push(format!("{}: {why}", topic.as_str()));
                continue;
            }
            budget.charge(cost);
            self.retained_bytes += cost;
            self.retained.insert(topic, payload);
        }
        self.retained_changed();
        if left_out.is_empty() {
            // What was loaded is what the file holds: no need to write it.
            if let Some(d) = &mut self.durable {
                d.retained = false;
            }
        }
        left_out
    }

    /// Serves again a client a previous broker served (adoption): its
    /// plain subscriptions are attached as by [`RouterCore::attach_as`]
    /// (all or nothing), then each one with options is subscribed as its
    /// `SUB` would be, judged again by the ACL and the limits. Retained
    /// messages are not sent again: these subscriptions are not new.
    ///
    /// # Errors
    /// As [`RouterCore::attach_as`]. `Ok` holds the options subscriptions
    /// refused, by their index in `subs`, with why.
    pub fn adopt(
        &mut self,
        key: ClientKey,
        outbox: Arc<Outbox>,
        who: Identity,
        subs: Vec<(Pattern, SubOptions)>,
    ) -> Result<Vec<(usize, ProtocolError)>, ProtocolError> {
        self.replaying = true;
        let plain = subs
            .iter()
            .filter(|(_, o)| o.is_plain())
            .map(|(p, _)| p.clone())
            .collect();
        let r = self.attach_as(key, outbox, who, plain).map(|()| {
            subs.into_iter()
                .enumerate()
                .filter(|(_, (_, o))| !o.is_plain())
                .filter_map(|(i, (p, o))| self.subscribe_with(key, p, o).err().map(|e| (i, e)))
                .collect()
        });
        self.replaying = false;
        r
    }

    fn mark_dirty(&mut self, key: ClientKey) {
        if let Some(d) = &mut self.durable {
            if d.dirty.is_empty() && !d.retained {
                d.changed.notify_one();
            }
            d.dirty.insert(key);
        }
    }

    /// Sets `--max-retained` and `--max-retained-bytes`.
    pub fn set_retain_limits(&mut self, limits: RetainLimits) {
        self.retain_limits = limits;
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
        let mut dropped_queues = Vec::new();
        for (&key, client) in &self.clients {
            for g in &client.queues {
                if self.policy.may_subscribe(&client.who, &g.0) == Sub::Denied {
                    dropped_queues.push((key, g.clone()));
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
        for (key, (p, q)) in dropped_queues {
            self.leave_queue(key, &p, &q);
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
        let distinct = subs.iter().collect::<HashSet<&Pattern>>();
        if distinct.len() > self.max_subscriptions {
            return Err(too_many_for_client(self.max_subscriptions));
        }
        self.subscriptions_fit(distinct.iter().map(|p| subscription_cost(p)).sum())?;
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
                queues: HashSet::new(),
                lossless: HashSet::new(),
                who,
                req: requests::ClientRequests::default(),
                info: None,
                no_echo: false,
            },
        );
        for p in subs {
            // Checked above, all together.
            if self.add_subscription(key, p.clone()) {
                self.send_retained(key, &p);
            }
        }
        Ok(())
    }

    /// `echo=no`: `key`'s own `PUB`s and `RETAIN`s are no longer delivered
    /// to it (its plain, lossless and queue subscriptions alike). Set
    /// before its first command, so that no message of its own reaches it.
    pub fn set_no_echo(&mut self, key: ClientKey) {
        if let Some(c) = self.clients.get_mut(&key) {
            c.no_echo = true;
        }
    }

    /// Whether `key` asked for `echo=no` (its durable record keeps it).
    pub fn no_echo(&self, key: ClientKey) -> bool {
        self.clients.get(&key).is_some_and(|c| c.no_echo)
    }

    /// Forgets a client and all its subscriptions. Idempotent.
    pub fn detach(&mut self, key: ClientKey) {
        if let Some(d) = &mut self.durable {
            d.dirty.remove(&key);
        }
        if let Some(client) = self.clients.remove(&key) {
            for p in &client.patterns {
                self.index.remove(p, key);
                self.subscription_bytes -= subscription_cost(p);
                self.counters.memory.credit(subscription_cost(p));
            }
            for g in &client.queues {
                self.remove_member(g, key);
            }
            self.lossless_clients.remove(&key);
            if let Some(u) = self.per_user.get_mut(&client.who.uid) {
                u.clients -= 1;
                u.subscriptions -= client.subscriptions();
                if u.clients == 0 {
                    self.per_user.remove(&client.who.uid);
                }
            }
            if client.subscriptions() > 0 {
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
        self.finish_command(key, d)
    }

    /// What follows every command (a line, or a run of `PUB` lines taken
    /// whole): its publisher stalls on the lossless subscribers it filled,
    /// and the memory budget is enforced. Returns `d` with what that cost.
    fn finish_command(&mut self, key: ClientKey, d: Delivery) -> Delivery {
        self.stalls.own = None;
        if !self.stalls.full.is_empty() {
            if let Some(c) = self.clients.get(&key) {
                c.outbox.stall_on(&self.stalls.full);
                self.counters.lossless_stalls.fetch_add(1, Relaxed);
            }
            self.stalls.full.clear();
        }
        if self.counters.memory.over() {
            // Shedding must see every line this batch queued so far.
            self.stage.flush();
        }
        let lost = self.reclaim();
        Delivery {
            dropped: d.dropped + lost,
            ..d
        }
    }

    /// Applies a client's whole batch (one read), as [`RouterCore::apply`]
    /// item by item, except that its plain deliveries are queued per
    /// subscriber once, at the end (or before anything else reaches that
    /// outbox): one lock and at most one writer wake-up per subscriber per
    /// batch, not per message. Returns the work done (lines plus deliveries
    /// and drops), for the router's turn.
    pub fn apply_batch(&mut self, key: ClientKey, items: Vec<Input>, read_at: Instant) -> usize {
        let mut work = 0;
        for item in items {
            work += item.lines();
            // Anything but a plain PUB may push into an outbox directly
            // (ERR, PONG, BYE, retained, requests, `_bus.`): after what is
            // held, so that every client's lines keep their order.
            let held = match &item {
                Input::Line(Ok(Command::Pub { topic, .. })) | Input::Pubs(PubRun { topic, .. }) => {
                    !is_bus_topic(topic)
                }
                Input::Line(_) => false,
            };
            if !held {
                self.stage.flush();
            }
            self.stage.active = held;
            let d = match item {
                Input::Line(line) => self.apply(key, line, read_at),
                Input::Pubs(run) => self.apply_run(key, &run, read_at),
            };
            work += d.delivered + d.dropped;
        }
        self.stage.active = false;
        self.stage.flush();
        work + self.reclaim()
    }

    /// A run of `PUB` lines to one topic (`protocol::run`), routed once
    /// when the route allows: its publisher known to be allowed there, no
    /// queue group or lossless subscriber to push to line by line.
    /// Otherwise, and for `_bus.` topics, its lines are applied one by one,
    /// as they would have been had the reader not taken them whole.
    fn apply_run(&mut self, key: ClientKey, run: &PubRun, read_at: Instant) -> Delivery {
        let Some(client) = self.clients.get(&key) else {
            return Delivery::default();
        };
        let (own, uid) = (
            client.no_echo.then(|| client.outbox.clone()),
            client.who.uid,
        );
        let topic = &run.topic;
        if is_bus_topic(topic) {
            return self.apply_each(key, run, read_at);
        }
        if !self.cache.contains_key(topic) {
            self.resolve(topic);
        }
        let route = &self.cache[topic];
        // Under an ACL, a publisher's first line to a topic is judged (and
        // the decision kept with the route) line by line; once it may
        // publish there, its runs go whole.
        let may = self.policy.is_open() || route.publishers.get(&key) == Some(&true);
        if !(may
            && route.groups.is_empty()
            && route.lossless.is_empty()
            && self
                .stage
                .budget_fits(&self.counters.memory, route.subscribers.len(), run))
        {
            return self.apply_each(key, run, read_at);
        }
        self.begin_publish(key, uid, own, topic);
        let d = deliver_run(
            &self.cache[topic],
            &mut self.stage,
            &self.counters,
            run,
            read_at,
            self.stalls.own.as_ref(),
        );
        self.finish_command(key, d)
    }

    /// A run's lines applied one by one, as `PUB` commands.
    fn apply_each(&mut self, key: ClientKey, run: &PubRun, read_at: Instant) -> Delivery {
        let mut sum = Delivery::default();
        for c in run.commands() {
            let d = self.apply(key, Ok(c), read_at);
            sum.delivered += d.delivered;
            sum.dropped += d.dropped;
            sum.disconnected += d.disconnected;
        }
        sum
    }

    /// What a client's `PUB` or `RETAIN` to `topic` sets up before it is
    /// delivered: whose uid may be stalled by a lossless subscriber, and
    /// (`echo=no`) the outbox delivery passes over. `false`, with
    /// `ERR forbidden` sent, for a `_bus.` topic: only the broker speaks there.
    fn begin_publish(
        &mut self,
        key: ClientKey,
        uid: u32,
        own: Option<Arc<Outbox>>,
        topic: &Topic,
    ) -> bool {
        self.stalls.uid = Some(uid);
        self.stalls.own = own;
        if is_bus_topic(topic) {
            self.refuse(key, forbidden(topic));
            return false;
        }
        true
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
                let own = client.no_echo.then(|| client.outbox.clone());
                if !self.begin_publish(key, client.who.uid, own, &topic) {
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
            Ok(Command::SubWith(p, opts)) => {
                if let Err(e) = self.subscribe_with(key, p, opts) {
                    self.counters.protocol_error(e.code);
                    if let Some(client) = self.clients.get(&key) {
                        client.outbox.push(encode::err(&e));
                    }
                }
            }
            Ok(Command::UnsubWith(p, SubOptions { queue, .. })) => match queue {
                Some(q) => self.leave_queue(key, &p, &q),
                None => self.unsubscribe(key, &p),
            },
            Ok(Command::Retain { topic, payload }) => {
                let own = client.no_echo.then(|| client.outbox.clone());
                if !self.begin_publish(key, client.who.uid, own, &topic) {
                    return Delivery::default();
                }
                return self.retain(key, &topic, &payload, read_at);
            }
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
                &mut self.stage,
                &self.counters,
                topic,
                payload,
                read_at,
                &mut self.stalls,
            );
        }
        self.resolve(topic);
        let route = &self.cache[topic];
        deliver(
            route,
            &mut self.stage,
            &self.counters,
            topic,
            payload,
            read_at,
            &mut self.stalls,
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
            if route.publishers.get(&key) != Some(&true) {
                // Its ERR must follow the lines this batch queued before.
                self.stage.flush();
            }
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
                &mut self.stage,
                &self.counters,
                topic,
                payload,
                read_at,
                &mut self.stalls,
            );
        }
        self.stage.flush();
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
            &mut self.stage,
            &self.counters,
            topic,
            payload,
            read_at,
            &mut self.stalls,
        )
    }

    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// Subscriptions in force: plain ones and queue memberships.
    pub fn subscription_count(&self) -> usize {
        self.index.len() + self.queue_members
    }

    /// Topics with a retained message, and the bytes they are charged.
    pub fn retained(&self) -> (usize, usize) {
        (self.retained.len(), self.retained_bytes)
    }

    fn resolve(&mut self, topic: &Topic) {
        self.index.matches(topic, &mut self.scratch);
        // A partial subscription matches topics its client may not receive:
        // they are left out here, once per topic.
        let open = self.policy.is_open();
        let lossless_clients = &self.lossless_clients;
        let subscribers: Arc<[Arc<Outbox>]> = self
            .scratch
            .iter()
            .filter(|k| lossless_clients.is_empty() || !lossless_clients.contains(k))
            .filter_map(|k| self.clients.get(k))
            .filter(|c| open || self.policy.may_receive(&c.who, topic))
            .map(|c| c.outbox.clone())
            .collect();
        let lossless: Box<[(Arc<Outbox>, u32)]> = if lossless_clients.is_empty() {
            Box::default()
        } else {
            self.scratch
                .iter()
                .filter(|k| lossless_clients.contains(k))
                .filter_map(|k| self.clients.get(k))
                .filter(|c| open || self.policy.may_receive(&c.who, topic))
                .map(|c| (c.outbox.clone(), c.who.uid))
                .collect()
        };
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
        self.group_index.matches(topic, &mut self.group_scratch);
        let groups: Box<[QueueRoute]> = self
            .group_scratch
            .iter()
            .filter_map(|id| self.groups.get(id))
            .filter_map(|g| {
                let members: Arc<[Arc<Outbox>]> = g
                    .members
                    .iter()
                    .filter_map(|k| self.clients.get(k))
                    .filter(|c| open || self.policy.may_receive(&c.who, topic))
                    .map(|c| c.outbox.clone())
                    .collect();
                (!members.is_empty()).then(|| QueueRoute {
                    members,
                    cursor: g.cursor.clone(),
                })
            })
            .collect();
        let route = Route {
            subscribers,
            counters,
            publishers: FastMap::default(),
            groups,
            lossless,
        };
        self.cache.insert(topic.detached(), route);
    }

    fn interest_changed(&mut self) {
        self.cache.clear();
        self.counters
            .subscriptions
            .store(self.subscription_count() as u64, Relaxed);
    }

    /// The limits and the policy's word on one more subscription to `p` for
    /// `client`, plain or queue.
    fn may_add(&self, client: &Client, p: &Pattern) -> Result<(), ProtocolError> {
        if client.subscriptions() >= self.max_subscriptions {
            return Err(too_many_for_client(self.max_subscriptions));
        }
        self.subscriptions_fit(subscription_cost(p))?;
        if self.policy.is_open() {
            return Ok(());
        }
        if self.policy.may_subscribe(&client.who, p) == Sub::Denied {
            return Err(forbidden(p));
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
        Ok(())
    }

    /// `SUB <pattern> <options>`: for now, options name a queue group.
    fn subscribe_with(
        &mut self,
        key: ClientKey,
        p: Pattern,
        opts: SubOptions,
    ) -> Result<(), ProtocolError> {
        let Some(q) = opts.queue else {
            if opts.lossless {
                return self.subscribe_lossless(key, p);
            }
            return self.subscribe(key, p);
        };
        let Some(client) = self.clients.get(&key) else {
            return Ok(());
        };
        let g = (p.detached(), q.detached());
        if client.queues.contains(&g) {
            return Ok(());
        }
        self.may_add(client, &p)?;
        let id = match self.group_ids.get(&g) {
            Some(&id) => id,
            None => {
                let id = self.next_group;
                self.next_group += 1;
                self.group_index.insert(&g.0, id);
                self.group_ids.insert(g.clone(), id);
                self.groups.insert(
                    id,
                    Group {
                        key: g.clone(),
                        members: Vec::new(),
                        cursor: Arc::default(),
                    },
                );
                id
            }
        };
        self.groups
            .get_mut(&id)
            .expect("just found or made")
            .members
            .push(key);
        let client = self.clients.get_mut(&key).expect("checked above");
        client.queues.insert(g);
        self.per_user
            .entry(client.who.uid)
            .or_default()
            .subscriptions += 1;
        self.queue_members += 1;
        self.interest_changed();
        self.mark_dirty(key);
        Ok(())
    }

    /// `SUB <pattern> lossless`: a plain subscription (an existing one is
    /// made lossless), and the client's outbox becomes lossless.
    fn subscribe_lossless(&mut self, key: ClientKey, p: Pattern) -> Result<(), ProtocolError> {
        let Some(client) = self.clients.get(&key) else {
            return Ok(());
        };
        if client.lossless.contains(&p) {
            return Ok(());
        }
        if !client.patterns.contains(&p) {
            self.subscribe(key, p.clone())?;
        }
        let client = self.clients.get_mut(&key).expect("checked above");
        if !client.patterns.contains(&p) {
            return Ok(()); // the client is gone
        }
        client.lossless.insert(p.detached());
        if self.lossless_clients.insert(key) {
            client.outbox.set_lossless(true);
            self.interest_changed();
        }
        self.mark_dirty(key);
        Ok(())
    }

    /// `UNSUB <pattern> queue=<name>`: the others take over at once.
    fn leave_queue(&mut self, key: ClientKey, p: &Pattern, q: &QueueName) {
        let g = (p.clone(), q.clone());
        let Some(client) = self.clients.get_mut(&key) else {
            return;
        };
        if !client.queues.remove(&g) {
            return;
        }
        if let Some(u) = self.per_user.get_mut(&client.who.uid) {
            u.subscriptions -= 1;
        }
        self.remove_member(&g, key);
        self.interest_changed();
        self.mark_dirty(key);
    }

    /// Takes `key` out of group `g`; the last member out removes the group.
    fn remove_member(&mut self, g: &GroupKey, key: ClientKey) {
        let Some(&id) = self.group_ids.get(g) else {
            return;
        };
        let group = self.groups.get_mut(&id).expect("ids and groups agree");
        let before = group.members.len();
        group.members.retain(|&k| k != key);
        self.queue_members -= before - group.members.len();
        if group.members.is_empty() {
            let group = self.groups.remove(&id).expect("just seen");
            self.group_index.remove(&group.key.0, id);
            self.group_ids.remove(g);
        }
    }

    /// Queues every retained message whose topic `p` matches (and the
    /// client may receive) for client `key`: the start of a new subscription.
    fn send_retained(&mut self, key: ClientKey, p: &Pattern) {
        if self.retained.is_empty() || self.replaying {
            return;
        }
        let Some(client) = self.clients.get(&key) else {
            return;
        };
        let open = self.policy.is_open();
        let now = Instant::now();
        let send = |topic: &Topic, payload: &Bytes| {
            if open || self.policy.may_receive(&client.who, topic) {
                let line = encode::msg(topic, payload);
                // Bounded by the retained limits: no publisher to stall.
                if client.outbox.is_lossless() {
                    client.outbox.push_lossless(&line, Some(now));
                } else {
                    client.outbox.push_line(&line, Some(now));
                }
            }
        };
        if p.is_literal() {
            let topic = Topic::parse(p.as_bytes()).expect("a literal pattern is a topic");
            if let Some(payload) = self.retained.get(&topic) {
                send(&topic, payload);
            }
            return;
        }
        // Bounded by --max-retained; in topic order, so that what a client
        // sees does not depend on the map's hashing.
        let mut matching: Vec<(&Topic, &Bytes)> =
            self.retained.iter().filter(|(t, _)| p.matches(t)).collect();
        matching.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (topic, payload) in matching {
            send(topic, payload);
        }
    }

    /// `RETAIN <topic> <payload>`: with a payload, published as `PUB` and
    /// kept as the topic's retained message; empty, the retained message is
    /// cleared and nothing is published. All or nothing: one the limits
    /// cannot hold is refused with `ERR retained-full` and not published.
    fn retain(
        &mut self,
        key: ClientKey,
        topic: &Topic,
        payload: &Bytes,
        read_at: Instant,
    ) -> Delivery {
        let Some(client) = self.clients.get(&key) else {
            return Delivery::default();
        };
        if !self.policy.is_open() && !self.policy.may_publish(&client.who, topic) {
            client.outbox.push(encode::err(&forbidden(topic)));
            self.counters.protocol_error(ErrorCode::Forbidden);
            return Delivery::default();
        }
        let old = self
            .retained
            .get(topic)
            .map_or(0, |p| retained_cost(topic, p));
        if payload.is_empty() {
            if self.retained.remove(topic).is_some() {
                self.retained_bytes -= old;
                self.counters.memory.credit(old);
                self.retained_changed();
            }
            return Delivery::default();
        }
        let new = retained_cost(topic, payload);
        let count = self.retained.len() + usize::from(old == 0);
        let bytes = self.retained_bytes - old + new;
        let budget = self.counters.memory.clone();
        let refusal = if count > self.retain_limits.messages {
            Some(format!(
                "{} topics already have a retained message (the broker's --max-retained); clear one with an empty RETAIN, or PUB instead",
                self.retain_limits.messages
            ))
        } else if bytes > self.retain_limits.bytes {
            Some(format!(
                "retained messages would take {bytes} bytes, over the broker's --max-retained-bytes {}; clear some with an empty RETAIN, or PUB instead",
                self.retain_limits.bytes
            ))
        } else if new > old && budget.held() + (new - old) > budget.limit() {
            Some("the broker's memory budget (--max-memory) is full; try again later, or PUB instead".to_owned())
        } else {
            None
        };
        if let Some(text) = refusal {
            let e = ProtocolError::new(ErrorCode::RetainedFull, text);
            client.outbox.push(encode::err(&e));
            self.counters.protocol_error(e.code);
            return Delivery::default();
        }
        let d = self.publish(topic, payload, read_at);
        self.retained
            .insert(topic.detached(), Bytes::copy_from_slice(payload));
        self.retained_bytes = bytes;
        budget.charge(new);
        budget.credit(old);
        self.retained_changed();
        d
    }

    fn retained_changed(&mut self) {
        if let Some(d) = &mut self.durable {
            if d.dirty.is_empty() && !d.retained {
                d.changed.notify_one();
            }
            d.retained = true;
        }
        let c = &self.counters;
        c.retained_messages
            .store(self.retained.len() as u64, Relaxed);
        c.retained_bytes.store(self.retained_bytes as u64, Relaxed);
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
        self.may_add(client, &p)?;
        if self.add_subscription(key, p.clone()) {
            // Not at attach: the session writes a new client's file itself.
            self.mark_dirty(key);
            self.send_retained(key, &p);
        }
        Ok(())
    }

    /// Whether `cost` more bytes of subscriptions stay within half the
    /// memory budget: the other half is kept for backlogs, so that
    /// subscriptions can never crowd out every message (backlogs are shed
    /// when the two together pass the budget; subscriptions never are).
    fn subscriptions_fit(&self, cost: usize) -> Result<(), ProtocolError> {
        let share = self.counters.memory.limit() / 2;
        if self.subscription_bytes + cost <= share {
            return Ok(());
        }
        Err(ProtocolError::new(
            ErrorCode::TooManySubscriptions,
            format!(
                "the broker's subscriptions use half its memory budget ({share} bytes of --max-memory); UNSUB some first, use wildcard patterns, or raise --max-memory"
            ),
        ))
    }

    /// Returns whether the subscription is new.
    fn add_subscription(&mut self, key: ClientKey, p: Pattern) -> bool {
        if let Some(client) = self.clients.get_mut(&key) {
            let p = p.detached();
            if client.patterns.insert(p.clone()) {
                self.index.insert(&p, key);
                self.subscription_bytes += subscription_cost(&p);
                self.counters.memory.charge(subscription_cost(&p));
                self.per_user
                    .entry(client.who.uid)
                    .or_default()
                    .subscriptions += 1;
                self.interest_changed();
                return true;
            }
        }
        false
    }

    fn unsubscribe(&mut self, key: ClientKey, p: &Pattern) {
        if let Some(client) = self.clients.get_mut(&key) {
            if client.lossless.remove(p) && client.lossless.is_empty() {
                self.lossless_clients.remove(&key);
                client.outbox.set_lossless(false);
            }
            if client.patterns.remove(p) {
                self.index.remove(p, key);
                self.subscription_bytes -= subscription_cost(p);
                self.counters.memory.credit(subscription_cost(p));
                if let Some(u) = self.per_user.get_mut(&client.who.uid) {
                    u.subscriptions -= 1;
                }
                self.interest_changed();
                self.mark_dirty(key);
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

/// The member of a queue group that gets the next message: round robin,
/// skipping members whose backlog has no room for the line (a busy member
/// gets no more until it has read some), so that the ones keeping up take
/// the work. When none has room, the next in turn gets it and its overflow
/// policy applies, as for a plain subscriber.
///
/// `own` (an `echo=no` publisher's outbox) is never chosen: `None` when
/// it is the group's only member.
fn choose<'a>(
    group: &'a QueueRoute,
    line_len: usize,
    own: Option<&Arc<Outbox>>,
) -> Option<&'a Arc<Outbox>> {
    let n = group.members.len();
    let start = group.cursor.load(Relaxed) % n;
    let candidates = || {
        (0..n)
            .map(move |i| (start + i) % n)
            .filter(|&j| own.is_none_or(|o| !Arc::ptr_eq(&group.members[j], o)))
    };
    let j = candidates()
        .find(|&j| group.members[j].has_room(line_len))
        .or_else(|| candidates().next())?;
    group.cursor.store(j + 1, Relaxed);
    Some(&group.members[j])
}

/// Encodes the message once into `stage` and queues it for every
/// subscriber of `route` (held in the stage while a batch is applied, see
/// `stage.rs`); counts it. A free function over the router's fields so that
/// the route can stay borrowed from the cache.
fn deliver(
    route: &Route,
    stage: &mut stage::Stage,
    counters: &Counters,
    topic: &Topic,
    payload: &Bytes,
    read_at: Instant,
    stalls: &mut Stalls,
) -> Delivery {
    let mut tally = Tally::default();
    let len = payload.len();
    let routed =
        !route.subscribers.is_empty() || !route.groups.is_empty() || !route.lossless.is_empty();
    if routed {
        if !route.groups.is_empty() || !route.lossless.is_empty() {
            // Their lines are pushed one by one: after what is held.
            stage.flush();
        }
        let r = stage.encode(topic, payload);
        // `echo=no` publishers only: one pointer comparison per subscriber.
        // (A clone: `stalls` is borrowed mutably below; free for `None`.)
        let own = stalls.own.clone();
        let own = own.as_ref();
        let lines = Lines {
            range: r.clone(),
            count: 1,
            payload: len,
            overhead: r.len() - len,
        };
        to_subscribers(route, stage, counters, &lines, own, read_at, &mut tally);
        let line = stage.line(r);
        let mut lossless = |outbox: &Arc<Outbox>, line| {
            let (push, full) = outbox.push_lossless(line, Some(read_at));
            if full {
                stalls.full.push(outbox.clone());
            }
            push
        };
        for group in route.groups.iter() {
            let Some(member) = choose(group, line.len(), own) else {
                continue;
            };
            // A lossless member (lossless by a subscription of its own) is
            // never full here unless all are: it loses, not stalls, then.
            let push = if member.is_lossless() {
                member.push_unstallable(line, Some(read_at))
            } else {
                member.push_line(line, Some(read_at))
            };
            tally.count(push, len);
        }
        for (outbox, uid) in route.lossless.iter() {
            if own.is_some_and(|o| Arc::ptr_eq(o, outbox)) {
                continue;
            }
            // One user's lossless reader must not hold back another's
            // publishers (a shared bus): their lines may be dropped for it.
            let push = if stalls.uid.is_none_or(|p| p == *uid) {
                lossless(outbox, line)
            } else {
                outbox.push_unstallable(line, Some(read_at))
            };
            tally.count(push, len);
        }
    }
    tally.record(route, counters, routed, 1, len)
}

/// What one publish did to its subscribers' outboxes, counted once, as
/// [`deliver`] and [`deliver_run`] both count it: which policy dropped is
/// told by each push's outcome, so the core needs no knowledge of the
/// configured policy to count it.
#[derive(Default)]
struct Tally {
    d: Delivery,
    oldest: usize,
    newest: usize,
    /// Payload bytes of the lines queued.
    delivered_bytes: usize,
}

impl Tally {
    /// One push of a line whose payload is `payload` bytes.
    fn count(&mut self, push: Push, payload: usize) {
        match push {
            Push::Queued => self.queued(1, payload),
            Push::QueuedDropping(n) => {
                self.queued(1, payload);
                self.oldest += n;
            }
            Push::Dropped => self.newest += 1,
            Push::Skipped(n) => self.oldest += n,
            Push::Disconnected(n) => self.d.disconnected += n + 1,
            Push::Closed => {}
        }
    }

    /// `lines` queued, `payload` bytes of payload in all.
    fn queued(&mut self, lines: usize, payload: usize) {
        self.d.delivered += lines;
        self.delivered_bytes += payload;
    }

    /// Writes the counts to the topic's and the broker's counters, for
    /// `published` messages of `published_bytes` payload bytes in all.
    fn record(
        mut self,
        route: &Route,
        counters: &Counters,
        routed: bool,
        published: usize,
        published_bytes: usize,
    ) -> Delivery {
        self.d.dropped = self.oldest + self.newest;
        let tc = &route.counters;
        tc.published.fetch_add(published as u64, Relaxed);
        tc.published_bytes
            .fetch_add(published_bytes as u64, Relaxed);
        if !routed {
            counters.unrouted.fetch_add(published as u64, Relaxed);
        } else {
            tc.delivered.fetch_add(self.d.delivered as u64, Relaxed);
            tc.delivered_bytes
                .fetch_add(self.delivered_bytes as u64, Relaxed);
        }
        counters.dropped(DropReason::BacklogOldest, self.oldest as u64);
        counters.dropped(DropReason::BacklogNewest, self.newest as u64);
        counters.dropped(DropReason::SlowConsumer, self.d.disconnected as u64);
        self.d
    }
}

/// [`deliver`] for a run of `PUB` lines to `run.topic`, on a route with
/// plain subscribers only: the run's `MSG` lines are copied once and held
/// for each subscriber as one range, or, where they do not certainly fit,
/// pushed line by line under the overflow policy, counted as [`deliver`]
/// counts each line. The topic's counters are written once per run.
fn deliver_run(
    route: &Route,
    stage: &mut stage::Stage,
    counters: &Counters,
    run: &PubRun,
    read_at: Instant,
    own: Option<&Arc<Outbox>>,
) -> Delivery {
    debug_assert!(route.groups.is_empty() && route.lossless.is_empty());
    let mut tally = Tally::default();
    let routed = !route.subscribers.is_empty();
    if routed {
        let lines = Lines {
            range: stage.encode_lines(&run.lines),
            count: run.count,
            payload: run.payload_bytes,
            overhead: run.overhead(),
        };
        to_subscribers(route, stage, counters, &lines, own, read_at, &mut tally);
    }
    tally.record(route, counters, routed, run.count, run.payload_bytes)
}

/// Encoded `MSG` lines in the stage: one message, or a run of them.
struct Lines {
    range: std::ops::Range<usize>,
    count: usize,
    /// Payload bytes in all.
    payload: usize,
    /// The bytes of each line that are not payload.
    overhead: usize,
}

/// Queues `lines` for each plain subscriber of `route` but `own` (the
/// publisher, with `echo=no`): held in the stage all together where they
/// certainly fit, else pushed one by one under the overflow policy (after
/// what is held for that outbox). Counted in `tally`.
fn to_subscribers(
    route: &Route,
    stage: &mut stage::Stage,
    counters: &Counters,
    lines: &Lines,
    own: Option<&Arc<Outbox>>,
    read_at: Instant,
    tally: &mut Tally,
) {
    let memory = &counters.memory;
    let mut budget = (memory.held(), memory.limit());
    let list = route.subscribers.as_ptr() as usize;
    for (at, outbox) in route.subscribers.iter().enumerate() {
        if own.is_some_and(|o| Arc::ptr_eq(o, outbox)) {
            continue;
        }
        let r = lines.range.clone();
        if stage.add((list, at), outbox, r.clone(), lines.count, read_at, budget) {
            tally.queued(lines.count, lines.payload);
            continue;
        }
        let bytes = stage.line(r);
        let mut start = 0;
        for nl in memchr::memchr_iter(b'\n', bytes) {
            let line = &bytes[start..=nl];
            start = nl + 1;
            tally.count(
                outbox.push_line(line, Some(read_at)),
                line.len() - lines.overhead,
            );
        }
        budget.0 = memory.held();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Reply;
    use crate::router::outbox::{BacklogLimits, Batch};

    /// Everything queued for `o`, taken and reported written as its writer
    /// would.
    fn lines(o: &Outbox) -> Vec<String> {
        let mut all = Vec::new();
        loop {
            let mut q = Batch::default();
            o.take(&mut q);
            if q.is_empty() {
                return all;
            }
            all.extend(
                q.lines()
                    .map(|l| String::from_utf8_lossy(l).trim_end().to_string()),
            );
            let (b, n) = q.clear();
            o.written(b, n);
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

    /// Lines as a batch of parsed lines, none taken as a run.
    fn each(items: Vec<Result<Command, ProtocolError>>) -> Vec<Input> {
        items.into_iter().map(Input::from).collect()
    }

    /// Lines as the reader makes them into a batch: runs of `PUB` lines
    /// taken whole, the rest parsed line by line.
    fn as_read(lines: &[String]) -> Vec<Input> {
        let mut buf = bytes::BytesMut::new();
        for l in lines {
            buf.extend_from_slice(l.as_bytes());
            buf.extend_from_slice(b"\n");
        }
        let mut splitter = crate::protocol::LineSplitter::new(1 << 20);
        let mut out = Vec::new();
        loop {
            if let Some(run) = splitter.take_pub_run(&mut buf, 1024) {
                out.push(Input::Pubs(run));
                continue;
            }
            match splitter.next_line(&mut buf) {
                Some(crate::protocol::Line::Complete(l)) => {
                    if let Some(c) = Command::parse(l).transpose() {
                        out.push(Input::Line(c));
                    }
                }
                Some(crate::protocol::Line::TooLong) => unreachable!("short lines"),
                None => return out,
            }
        }
    }

    fn client(core: &mut RouterCore, key: ClientKey, subs: &[&str]) -> Arc<Outbox> {
        let o = Arc::new(Outbox::new(BacklogLimits::default()));
        let subs = subs.iter().map(|s| s.parse().unwrap()).collect();
        core.attach(key, o.clone(), subs);
        o
    }

    /// Locks taken on `o` while `f` runs.
    fn locks(o: &Outbox, f: impl FnOnce()) -> usize {
        let before = o.pushes.load(Relaxed);
        f();
        o.pushes.load(Relaxed) - before
    }

    #[test]
    fn a_batch_locks_each_outbox_once_and_keeps_replies_in_place() {
        let mut core = RouterCore::new(Counters::new(100));
        let a = client(&mut core, 1, &["t"]);
        let b = client(&mut core, 2, &["t", "u"]);
        let p = client(&mut core, 3, &["t"]);
        for runs in [false, true] {
            let mut items: Vec<_> = (0..100).map(|i| format!("PUB t {i}")).collect();
            items.push("PUB u x".to_owned());
            let items = if runs {
                as_read(&items)
            } else {
                each(items.iter().map(|l| cmd(l)).collect())
            };
            let n = locks(&a, || {
                assert_eq!(
                    locks(&b, || {
                        core.apply_batch(3, items, Instant::now());
                    }),
                    1,
                    "one lock for 101 lines on two topics"
                );
            });
            assert_eq!(n, 1, "one lock for 100 lines");
            assert_eq!(lines(&a).len(), 100);
            assert_eq!(lines(&b).len(), 101);
            assert_eq!(lines(&p).len(), 100);
        }
        // A reply in the middle of a batch follows what came before it.
        for runs in [false, true] {
            let mut items: Vec<_> = (0..3).map(|i| format!("PUB t {i}")).collect();
            items.extend(["PING x", "SUB", "PUB t 3"].map(String::from));
            let items = if runs {
                as_read(&items)
            } else {
                each(items.iter().map(|l| cmd(l)).collect())
            };
            core.apply_batch(3, items, Instant::now());
            let got = lines(&p);
            assert_eq!(got[..4], ["MSG t 0", "MSG t 1", "MSG t 2", "PONG x"]);
            assert!(got[4].starts_with("ERR "), "{got:?}");
            assert_eq!(got[5], "MSG t 3");
        }
        let t = core.counters.topic("t").expect("counted");
        assert_eq!(t.delivered.load(Relaxed), 2 * (3 * 100 + 3 * 4));
    }

    /// A batch alternating between topics with different subscribers, and
    /// one whose topics outnumber the match cache (cleared in mid-batch, so
    /// a route's address may be reused by another): each line reaches
    /// exactly its topic's subscribers, in order.
    #[test]
    fn a_batch_over_many_routes_delivers_each_line_to_its_own_subscribers() {
        let mut core = RouterCore::new(Counters::new(100));
        let a = client(&mut core, 1, &["t.a"]);
        let b = client(&mut core, 2, &["t.b", "t.n.*"]);
        let both = client(&mut core, 3, &["t.*"]);
        let mut items = Vec::new();
        for i in 0..6 {
            items.push(cmd(&format!(
                "PUB t.{} {i}",
                if i % 2 == 0 { "a" } else { "b" }
            )));
        }
        let many = MATCH_CACHE_MAX + 10;
        for i in 0..many {
            items.push(cmd(&format!("PUB t.n.{i} {i}")));
        }
        core.apply_batch(1, each(items), Instant::now());
        assert_eq!(lines(&a), ["MSG t.a 0", "MSG t.a 2", "MSG t.a 4"]);
        let got_b = lines(&b);
        assert_eq!(got_b[..3], ["MSG t.b 1", "MSG t.b 3", "MSG t.b 5"]);
        let expect: Vec<String> = (0..many).map(|i| format!("MSG t.n.{i} {i}")).collect();
        assert_eq!(got_b[3..], expect[..]);
        let got = lines(&both);
        assert_eq!(got.len(), 6, "t.* matches t.a and t.b only: {:?}", &got[..]);
        assert_eq!(got[..2], ["MSG t.a 0", "MSG t.b 1"]);
    }

    /// The same lines and counts, whether a batch is applied whole or line
    /// by line, whatever the caps and policy drop.
    #[test]
    fn a_batch_drops_and_counts_exactly_as_line_by_line() {
        for policy in [
            crate::router::OverflowPolicy::DropOldest,
            crate::router::OverflowPolicy::DropNewest,
            crate::router::OverflowPolicy::Disconnect,
        ] {
            for messages in [1, 5, 37, 200] {
                // 0: line by line; 1: a batch of lines; 2: a batch of runs.
                let run = |how: u8| {
                    let mut core = RouterCore::new(Counters::new(100));
                    let limits = BacklogLimits {
                        messages,
                        bytes: 1 << 20,
                        policy,
                    };
                    let outs: Vec<Arc<Outbox>> = (1..=3)
                        .map(|k| {
                            let o = Arc::new(Outbox::new(limits));
                            core.attach(k, o.clone(), vec!["t".parse().unwrap()]);
                            o
                        })
                        .collect();
                    // The first reader takes a batch early: it holds lines.
                    let mut hand = Batch::default();
                    let items = |r: std::ops::Range<u32>| -> Vec<_> {
                        r.map(|i| format!("PUB t {i}")).collect()
                    };
                    let at = Instant::now();
                    for (n, r) in [0..20, 20..120, 120..121].into_iter().enumerate() {
                        match how {
                            0 => {
                                for item in items(r) {
                                    core.apply(9, cmd(&item), at);
                                }
                            }
                            1 => {
                                let lines = items(r).iter().map(|l| cmd(l)).collect();
                                core.apply_batch(9, each(lines), at);
                            }
                            _ => {
                                core.apply_batch(9, as_read(&items(r)), at);
                            }
                        }
                        if n == 0 {
                            outs[0].take(&mut hand);
                        }
                    }
                    let got: Vec<Vec<String>> = outs.iter().map(|o| lines(o)).collect();
                    let t = core.counters.topic("t").expect("counted");
                    let c = &core.counters;
                    let counts = (
                        t.delivered.load(Relaxed),
                        c.dropped_total(DropReason::BacklogOldest),
                        c.dropped_total(DropReason::BacklogNewest),
                        c.dropped_total(DropReason::SlowConsumer),
                    );
                    (got, counts)
                };
                let one_by_one = run(0);
                assert_eq!(run(1), one_by_one, "{policy} with {messages} lines");
                assert_eq!(
                    run(2),
                    one_by_one,
                    "{policy} with {messages} lines, as runs"
                );
            }
        }
    }

    /// Runs (as the reader takes them) on routes that need decisions line
    /// by line (queue groups, a lossless subscriber that fills and stalls
    /// its publisher, `echo=no`, `_bus.`), mixed with other commands: every
    /// client gets the same lines, and the counters count the same, as when
    /// each line is its own command.
    #[test]
    fn runs_mean_what_their_lines_mean_on_every_kind_of_route() {
        let run = |runs: bool| {
            let mut core = RouterCore::new(Counters::new(100));
            let small = BacklogLimits {
                messages: 7,
                bytes: 1 << 20,
                policy: crate::router::OverflowPolicy::DropOldest,
            };
            let outs: Vec<Arc<Outbox>> = (1..=5)
                .map(|k| {
                    let o = Arc::new(Outbox::new(small));
                    core.attach(k, o.clone(), vec![]);
                    o
                })
                .collect();
            core.now(1, cmd("SUB t.>"));
            core.now(2, cmd("SUB t.q queue=g"));
            core.now(3, cmd("SUB t.q queue=g"));
            core.now(4, cmd("SUB t.l lossless"));
            core.now(5, cmd("SUB t.>"));
            core.set_no_echo(5);
            let mut batch = Vec::new();
            for i in 0..40 {
                let t = ["t.a", "t.q", "t.l", "_bus.x"][i / 10];
                batch.push(format!("PUB {t} m{i}"));
                if i % 7 == 3 {
                    batch.push(format!("PING p{i}"));
                }
            }
            let at = Instant::now();
            for chunk in batch.chunks(9) {
                if runs {
                    core.apply_batch(5, as_read(chunk), at);
                } else {
                    core.apply_batch(5, each(chunk.iter().map(|l| cmd(l)).collect()), at);
                }
            }
            let stalled = outs[4].is_stalled();
            let got: Vec<Vec<String>> = outs.iter().map(|o| lines(o)).collect();
            let c = &core.counters;
            let topics: Vec<_> = ["t.a", "t.q", "t.l"]
                .iter()
                .map(|t| {
                    let t = c.topic(t).expect("counted");
                    (
                        t.published.load(Relaxed),
                        t.delivered.load(Relaxed),
                        t.delivered_bytes.load(Relaxed),
                    )
                })
                .collect();
            let drops = c.dropped_total(DropReason::BacklogOldest);
            (got, topics, drops, stalled)
        };
        let (got, topics, drops, stalled) = run(true);
        assert!(
            got[0].iter().any(|l| l.starts_with("DROPPED")),
            "{:?}",
            got[0]
        );
        assert!(got[4].iter().any(|l| l.starts_with("ERR forbidden _bus.x")));
        assert!(!got[4].iter().any(|l| l.starts_with("MSG")), "echo=no");
        assert!(
            stalled,
            "the lossless subscriber filled: its publisher stalls"
        );
        assert_eq!((got, topics, drops, stalled), run(false));
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
    fn echo_no_keeps_a_publishers_own_messages_from_it_and_only_those() {
        let mut core = RouterCore::new(Counters::new(100));
        // The bridge: overlapping plain, lossless and queue subscriptions.
        let me = client(&mut core, 1, &["t.>", "t.*"]);
        core.set_no_echo(1);
        core.now(1, cmd("SUB t.a lossless"));
        core.now(1, cmd("SUB t.> queue=g"));
        let other = client(&mut core, 2, &["t.a"]);
        let member = client(&mut core, 3, &[]);
        core.now(3, cmd("SUB t.> queue=g"));
        for i in 0..4 {
            core.now(1, cmd(&format!("PUB t.a m{i}")));
        }
        core.now(1, cmd("RETAIN t.a r"));
        core.now(1, cmd("PING p"));
        // Nothing of its own, by any subscription; its PONG still comes.
        assert_eq!(lines(&me), ["PONG p"]);
        assert_eq!(
            lines(&other),
            [
                "MSG t.a m0",
                "MSG t.a m1",
                "MSG t.a m2",
                "MSG t.a m3",
                "MSG t.a r"
            ]
        );
        // The group's other member takes every message, not every second.
        assert_eq!(
            lines(&member),
            [
                "MSG t.a m0",
                "MSG t.a m1",
                "MSG t.a m2",
                "MSG t.a m3",
                "MSG t.a r"
            ]
        );
        // Others' messages reach it by every subscription as before (one
        // line per plain/lossless match, plus its turn in the group).
        core.now(2, cmd("PUB t.a x"));
        core.now(2, cmd("PUB t.a y"));
        let got = lines(&me);
        assert_eq!(
            got.iter().filter(|l| *l == "MSG t.a x").count()
                + got.iter().filter(|l| *l == "MSG t.a y").count(),
            got.len()
        );
        assert!(
            got.contains(&"MSG t.a x".to_owned()) && got.contains(&"MSG t.a y".to_owned()),
            "{got:?}"
        );
        assert!(core.no_echo(1) && !core.no_echo(2));
        // Alone in its group, its messages go to no member.
        core.now(3, cmd("UNSUB t.> queue=g"));
        core.now(2, cmd("UNSUB t.a"));
        let d = core.now(1, cmd("PUB t.b alone"));
        assert_eq!(d.delivered, 0);
        assert!(lines(&me).is_empty());
    }

    #[test]
    fn echo_yes_is_the_default() {
        let mut core = RouterCore::new(Counters::new(100));
        let me = client(&mut core, 1, &["t"]);
        core.now(1, cmd("PUB t 1"));
        assert_eq!(lines(&me), ["MSG t 1"]);
        assert!(!core.no_echo(1));
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

        /// Runs of `PUB` lines (as the reader takes them) are judged as
        /// their lines: a refused publisher gets one `ERR` per line, an
        /// allowed one's runs are delivered whole, and a new policy that
        /// refuses it holds from its next run on.
        #[test]
        fn runs_are_judged_as_their_lines() {
            let mut core = core(CHAT);
            let counters = core.counters.clone();
            let a = join(&mut core, 1, ALICE, &["chat.>"]).unwrap();
            let c = join(&mut core, 3, CAROL, &[]).unwrap();
            let lines3 =
                |m: &str| -> Vec<String> { (0..3).map(|i| format!("PUB chat.x {m}{i}")).collect() };
            core.apply_batch(3, as_read(&lines3("no")), Instant::now());
            assert_eq!(lines(&c), ["ERR forbidden chat.x"; 3]);
            for _ in 0..2 {
                core.apply_batch(1, as_read(&lines3("ok")), Instant::now());
            }
            let ok: Vec<String> = (0..3).map(|i| format!("MSG chat.x ok{i}")).collect();
            assert_eq!(lines(&a), [ok.clone(), ok].concat());
            core.set_policy(policy("default deny\nallow sub chat.> user=alice"));
            core.apply_batch(1, as_read(&lines3("late")), Instant::now());
            assert_eq!(lines(&a), ["ERR forbidden chat.x"; 3]);
            assert_eq!(counters.protocol_errors(ErrorCode::Forbidden), 6);
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

    mod queues {
        use super::*;

        /// A client with these limits; and the publisher (key 9) once.
        fn member(core: &mut RouterCore, key: ClientKey, limits: BacklogLimits) -> Arc<Outbox> {
            if !core.clients.contains_key(&9) {
                client(core, 9, &[]);
            }
            let o = Arc::new(Outbox::new(limits));
            core.attach(key, o.clone(), Vec::new());
            o
        }

        #[test]
        fn each_message_goes_to_one_member_of_each_group_and_to_every_plain_subscriber() {
            let mut core = RouterCore::new(Counters::new(100));
            let w1 = member(&mut core, 2, BacklogLimits::default());
            let w2 = member(&mut core, 3, BacklogLimits::default());
            let other = member(&mut core, 4, BacklogLimits::default());
            core.now(2, cmd("SUB jobs.> queue=w"));
            core.now(3, cmd("SUB jobs.> queue=w"));
            core.now(3, cmd("SUB jobs.> queue=w")); // held already
            core.now(4, cmd("SUB jobs.* queue=w")); // another pattern: another group
            let plain = client(&mut core, 1, &["jobs.>"]);
            assert_eq!(core.subscription_count(), 4);
            for i in 0..6 {
                core.now(9, cmd(&format!("PUB jobs.x {i}")));
            }
            assert_eq!(lines(&plain).len(), 6);
            let (a, b) = (lines(&w1), lines(&w2));
            assert_eq!(a, ["MSG jobs.x 0", "MSG jobs.x 2", "MSG jobs.x 4"]);
            assert_eq!(b, ["MSG jobs.x 1", "MSG jobs.x 3", "MSG jobs.x 5"]);
            assert_eq!(lines(&other).len(), 6, "alone in its group");
        }

        #[test]
        fn a_member_whose_backlog_is_full_is_passed_over() {
            let mut core = RouterCore::new(Counters::new(100));
            let small = BacklogLimits {
                messages: 3,
                ..BacklogLimits::default()
            };
            let busy = member(&mut core, 1, small);
            let idle = member(&mut core, 2, small);
            core.now(1, cmd("SUB t queue=w"));
            core.now(2, cmd("SUB t queue=w"));
            let mut got_idle = Vec::new();
            for i in 0..30 {
                let d = core.now(9, cmd(&format!("PUB t {i}")));
                assert_eq!(d.dropped, 0, "message {i}");
                // The idle one reads everything at once; the busy one nothing.
                got_idle.extend(lines(&idle));
            }
            let got_busy = lines(&busy);
            assert_eq!(got_busy.len(), 3, "its backlog's worth: {got_busy:?}");
            assert_eq!(got_busy.len() + got_idle.len(), 30);
        }

        #[test]
        fn when_a_member_leaves_the_others_take_over() {
            let mut core = RouterCore::new(Counters::new(100));
            let w1 = member(&mut core, 1, BacklogLimits::default());
            let w2 = member(&mut core, 2, BacklogLimits::default());
            let w3 = member(&mut core, 3, BacklogLimits::default());
            for k in 1..=3 {
                core.now(k, cmd("SUB t queue=w"));
            }
            core.detach(1);
            core.now(2, cmd("UNSUB t queue=w"));
            core.now(2, cmd("UNSUB t")); // not a plain subscriber: nothing
            for i in 0..4 {
                core.now(9, cmd(&format!("PUB t {i}")));
            }
            assert!(lines(&w1).is_empty());
            assert!(lines(&w2).is_empty());
            assert_eq!(lines(&w3).len(), 4);
            core.detach(3);
            assert_eq!(core.subscription_count(), 0);
            assert!(core.groups.is_empty() && core.group_ids.is_empty());
            assert!(core.group_index.is_empty());
        }

        #[test]
        fn queue_memberships_count_against_max_subscriptions() {
            let mut core = RouterCore::new(Counters::new(100));
            core.set_max_subscriptions(2);
            let a = client(&mut core, 1, &["x"]);
            core.now(1, cmd("SUB t queue=a"));
            core.now(1, cmd("SUB t queue=b"));
            let got = lines(&a);
            assert_eq!(got.len(), 1, "{got:?}");
            assert!(got[0].starts_with("ERR too-many-subscriptions "), "{got:?}");
        }
    }

    mod lossless {
        use super::*;

        fn small() -> BacklogLimits {
            BacklogLimits {
                messages: 4,
                ..BacklogLimits::default()
            }
        }

        fn join(core: &mut RouterCore, key: ClientKey, limits: BacklogLimits) -> Arc<Outbox> {
            let o = Arc::new(Outbox::with_budget(limits, core.counters.memory.clone()));
            core.attach(key, o.clone(), Vec::new());
            o
        }

        #[test]
        fn a_full_lossless_subscriber_stalls_its_publisher_and_loses_nothing() {
            let mut core = RouterCore::new(Counters::new(100));
            let l = join(&mut core, 1, small());
            let plain = join(&mut core, 2, small());
            let p = join(&mut core, 9, BacklogLimits::default());
            let other = join(&mut core, 8, BacklogLimits::default());
            core.now(1, cmd("SUB t lossless"));
            core.now(2, cmd("SUB t"));
            for i in 0..3 {
                core.now(9, cmd(&format!("PUB t {i}")));
            }
            assert!(!p.is_stalled(), "room left");
            // The fourth fills it: the publisher is stalled, not the other one.
            let d = core.now(9, cmd("PUB t 3"));
            assert_eq!(d.dropped, 0);
            assert!(p.is_stalled());
            assert!(l.is_lossless_full());
            core.now(8, cmd("PUB u x"));
            assert!(!other.is_stalled(), "unrelated publishers go on");
            // What was in flight is still queued, beyond the cap.
            core.now(9, cmd("PUB t 4"));
            let got = lines(&l);
            assert_eq!(got.len(), 5, "{got:?}");
            assert_eq!(got[4], "MSG t 4");
            assert!(!p.is_stalled(), "drained: the publisher may go on");
            // A plain subscriber keeps its own policy.
            let plain_got = lines(&plain);
            assert!(plain_got[0].starts_with("DROPPED"), "{plain_got:?}");
            assert_eq!(core.counters.lossless_stalls.load(Relaxed), 2);
        }

        #[test]
        fn a_lossless_reader_holds_back_only_its_own_users_publishers() {
            let mut core = RouterCore::new(Counters::new(100));
            let mut join_as = |key, uid, limits| {
                let o = Arc::new(Outbox::new(limits));
                core.attach_as(key, o.clone(), Identity::new(uid, vec![uid]), Vec::new())
                    .unwrap();
                o
            };
            let l = join_as(1, 1000, small());
            let own = join_as(2, 1000, BacklogLimits::default());
            let other = join_as(3, 2000, BacklogLimits::default());
            core.now(1, cmd("SUB t lossless"));
            for i in 0..7 {
                core.now(3, cmd(&format!("PUB t other-{i}")));
            }
            assert!(!other.is_stalled(), "another user's publisher goes on");
            core.now(2, cmd("PUB t own"));
            assert!(own.is_stalled(), "its own user's is held back");
            let got = lines(&l);
            assert_eq!(
                got,
                [
                    "MSG t other-0",
                    "MSG t other-1",
                    "MSG t other-2",
                    "MSG t other-3",
                    "DROPPED 3",
                    "MSG t own"
                ],
                "the gap reported where it is, in one line"
            );
        }

        #[test]
        fn unsub_makes_it_an_ordinary_subscriber_again_and_the_budget_never_sheds_it() {
            let counters = Counters::new(100);
            // Room for the subscription (held to half the budget) first;
            // then 200 bytes for backlogs beside what it is charged.
            counters.memory.set_limit(1000);
            let mut core = RouterCore::new(counters);
            let l = join(&mut core, 1, BacklogLimits::default());
            join(&mut core, 9, BacklogLimits::default());
            core.now(1, cmd("SUB t"));
            core.now(1, cmd("SUB t lossless")); // an upgrade, not a second one
            assert_eq!(core.subscription_count(), 1);
            let budget = &core.counters.memory;
            budget.set_limit(200 + budget.held());
            assert!(l.is_lossless());
            for i in 0..10 {
                core.now(9, cmd(&format!("PUB t {i:04}")));
            }
            assert!(core.counters.memory.over(), "held, not shed");
            assert_eq!(lines(&l).len(), 10);
            core.now(1, cmd("UNSUB t"));
            assert!(!l.is_lossless());
            assert_eq!(core.subscription_count(), 0);
        }
    }

    mod retained {
        use super::*;

        fn core_with(limits: RetainLimits) -> RouterCore {
            let mut core = RouterCore::new(Counters::new(100));
            core.set_retain_limits(limits);
            core
        }

        #[test]
        fn a_new_subscription_gets_the_last_retained_message_first() {
            let mut core = core_with(RetainLimits::default());
            let p = client(&mut core, 9, &[]);
            let early = client(&mut core, 1, &["s.>"]);
            core.now(9, cmd("RETAIN s.a 1"));
            core.now(9, cmd("RETAIN s.a 2"));
            core.now(9, cmd("RETAIN s.b 3"));
            core.now(9, cmd("PUB s.c live"));
            assert_eq!(
                lines(&early),
                ["MSG s.a 1", "MSG s.a 2", "MSG s.b 3", "MSG s.c live"],
                "a retained message is also published"
            );
            let late = client(&mut core, 2, &["s.a"]);
            core.now(2, cmd("SUB s.*"));
            core.now(2, cmd("SUB s.*")); // not new: nothing again
            core.now(9, cmd("PUB s.a 4"));
            assert_eq!(
                lines(&late),
                ["MSG s.a 2", "MSG s.a 2", "MSG s.b 3", "MSG s.a 4"]
            );
            // An empty payload clears, and is not published.
            core.now(9, cmd("RETAIN s.a"));
            core.now(9, cmd("RETAIN s.never"));
            assert!(lines(&early).len() == 1, "only PUB s.a 4");
            let later = client(&mut core, 3, &["s.>"]);
            assert_eq!(lines(&later), ["MSG s.b 3"]);
            assert!(lines(&p).is_empty());
            assert_eq!(core.retained().0, 1);
        }

        #[test]
        fn retained_messages_are_bounded_in_count_and_bytes() {
            let mut core = core_with(RetainLimits {
                messages: 2,
                bytes: 2 * retained_cost(&topic("t.1"), b"xx"),
            });
            let sub = client(&mut core, 1, &["t.>"]);
            let p = client(&mut core, 9, &[]);
            core.now(9, cmd("RETAIN t.1 x"));
            core.now(9, cmd("RETAIN t.2 x"));
            core.now(9, cmd("RETAIN t.3 x")); // a third topic
            core.now(9, cmd("RETAIN t.1 xx")); // replaces: fits
            core.now(9, cmd("RETAIN t.2 xxx")); // one byte too many
            let errs = lines(&p);
            assert_eq!(errs.len(), 2, "{errs:?}");
            assert!(
                errs[0].starts_with("ERR retained-full 2 topics"),
                "{errs:?}"
            );
            assert!(errs[1].contains("--max-retained-bytes"), "{errs:?}");
            assert_eq!(
                lines(&sub),
                ["MSG t.1 x", "MSG t.2 x", "MSG t.1 xx"],
                "a refused RETAIN is not published either"
            );
            assert_eq!(
                core.retained(),
                (
                    2,
                    retained_cost(&topic("t.1"), b"xx") + retained_cost(&topic("t.2"), b"x")
                )
            );
            assert_eq!(core.counters.protocol_errors(ErrorCode::RetainedFull), 2);
        }

        #[test]
        fn retained_bytes_are_held_against_the_memory_budget() {
            let counters = Counters::new(100);
            let cost = retained_cost(&topic("t"), b"hello");
            counters.memory.set_limit(cost + 10);
            let mut core = RouterCore::new(counters);
            let p = client(&mut core, 9, &[]);
            core.now(9, cmd("RETAIN t hello"));
            assert_eq!(core.counters.memory.held(), cost);
            core.now(9, cmd("RETAIN u hello"));
            let got = lines(&p);
            assert_eq!(got.len(), 1, "{got:?}");
            assert!(got[0].contains("--max-memory"), "{got:?}");
            core.now(9, cmd("RETAIN t"));
            assert_eq!(core.counters.memory.held(), 0, "cleared: credited back");
        }

        #[test]
        fn loaded_retained_messages_keep_the_limits_and_reach_new_subscriptions_only() {
            let mut core = core_with(RetainLimits {
                messages: 2,
                bytes: 1 << 20,
            });
            let changed = Arc::new(tokio::sync::Notify::new());
            core.track_changes(changed);
            let msgs = ["a", "b", "c"]
                .map(|t| (topic(t), Bytes::from(format!("v{t}"))))
                .to_vec();
            let left_out = core.load_retained(msgs);
            assert_eq!(left_out, ["c: over --max-retained"]);
            let a = retained_cost(&topic("a"), b"va");
            assert_eq!(core.retained(), (2, 2 * a));
            assert_eq!(core.counters.memory.held(), 2 * a, "charged");
            // Left out: the file is written again with what was kept.
            let written = core.take_dirty().retained.expect("retained rewritten");
            assert_eq!(written.len(), 2);
            // An adopted subscription is not new: nothing; a new one: all.
            let o = Arc::new(Outbox::new(BacklogLimits::default()));
            let sub = |s: &str| (s.parse().unwrap(), SubOptions::default());
            core.adopt(1, o.clone(), Identity::default(), vec![sub(">")])
                .unwrap();
            assert!(lines(&o).is_empty());
            let late = client(&mut core, 2, &[">"]);
            assert_eq!(lines(&late), ["MSG a va", "MSG b vb"]);
        }

        #[test]
        fn adoption_restores_queue_memberships_and_lossless_subscriptions() {
            let mut core = core_with(RetainLimits::default());
            let texts = ["t lossless", "jobs queue=w", "plain"];
            let subs = texts
                .iter()
                .map(|t| crate::state::parse_sub(t).unwrap())
                .collect();
            let a = Arc::new(Outbox::new(BacklogLimits::default()));
            assert!(core
                .adopt(1, a.clone(), Identity::default(), subs)
                .unwrap()
                .is_empty());
            assert!(a.is_lossless());
            let mut got = core.subscription_texts(1);
            got.sort();
            assert_eq!(got, ["jobs queue=w", "plain", "t lossless"]);
            let b = client(&mut core, 2, &[]);
            core.now(2, cmd("SUB jobs queue=w"));
            let _p = client(&mut core, 9, &[]);
            for i in 0..4 {
                core.now(9, cmd(&format!("PUB jobs {i}")));
            }
            assert_eq!((lines(&a).len(), lines(&b).len()), (2, 2), "shared");
        }

        fn topic(s: &str) -> Topic {
            s.parse().unwrap()
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
        let mut q = Batch::default();
        assert_eq!(a.take(&mut q), Some(CloseReason::Bye));
        let got: Vec<&[u8]> = q.lines().collect();
        assert_eq!(got, [&b"MSG t 1\n"[..], b"BYE\n"]);
    }

    mod budget {
        use super::*;
        use crate::router::outbox::{OverflowPolicy, RUN_COST};

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
            let subs: Vec<Pattern> = subs.iter().map(|s| s.parse().unwrap()).collect();
            // The budget these tests reason about is the backlogs': widen it
            // by what the subscriptions are charged.
            let charged: usize = subs.iter().map(subscription_cost).sum();
            let budget = &core.counters.memory;
            budget.set_limit(budget.limit() + charged);
            core.attach(key, o.clone(), subs);
            o
        }

        /// "MSG <topic> <4-digit n>\n" costs this against the budget.
        fn cost(topic: &str) -> usize {
            "MSG  0000\n".len() + topic.len() + RUN_COST
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

        /// Runs as the reader takes them are held to the budget as their
        /// lines are: a run that does not certainly fit goes line by line,
        /// so the broker never ends a batch over its budget, and every
        /// client gets the same lines and `DROPPED` as line by line.
        #[test]
        fn runs_are_held_to_the_budget_as_their_lines_are() {
            let run = |runs: bool| {
                let mut core = core(30 * cost("t"));
                let outs: Vec<_> = (1..=3)
                    .map(|k| join(&mut core, k, &["t"], OverflowPolicy::DropOldest))
                    .collect();
                join(&mut core, 9, &[], OverflowPolicy::DropOldest);
                let mut batches = 0;
                for chunk in (0..400).collect::<Vec<u32>>().chunks(100) {
                    let lines: Vec<String> =
                        chunk.iter().map(|i| format!("PUB t {i:04}")).collect();
                    let items = if runs {
                        as_read(&lines)
                    } else {
                        each(lines.iter().map(|l| cmd(l)).collect())
                    };
                    core.apply_batch(9, items, Instant::now());
                    let held = core.counters.memory.held();
                    assert!(held <= core.counters.memory.limit(), "over budget: {held}");
                    batches += 1;
                }
                assert_eq!(batches, 4);
                let mut got: Vec<Vec<String>> = outs.iter().map(|o| lines(o)).collect();
                for g in &got {
                    account(g, "t", 400);
                }
                // Which of equal backlogs pays first follows the client
                // table's (seeded) order: compare what the clients got, not who.
                got.sort();
                (got, core.counters.dropped_total(DropReason::MemoryBudget))
            };
            let (got, dropped) = run(true);
            assert!(dropped > 0, "the budget was reached");
            assert_eq!((got, dropped), run(false));
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
                subscription_cost(&"t".parse().unwrap()),
                "taken: only the subscription is held"
            );
        }
    }

    #[test]
    fn subscriptions_are_held_to_half_the_memory_budget_and_counted_in_it() {
        let counters = Counters::new(100);
        // Room for 10 subscriptions of a one-byte pattern in half the budget.
        let one = SUBSCRIPTION_OVERHEAD + 1;
        counters.memory.set_limit(2 * 10 * one);
        let mut core = RouterCore::new(counters);
        let a = client(&mut core, 1, &[]);
        for c in 'a'..='l' {
            core.now(1, cmd(&format!("SUB {c}")));
        }
        let got = lines(&a);
        assert_eq!(got.len(), 2, "the 11th and 12th are refused: {got:?}");
        assert!(
            got[0].starts_with(
                "ERR too-many-subscriptions the broker's subscriptions use half its memory budget"
            ),
            "{got:?}"
        );
        assert_eq!(core.counters.memory.held(), 10 * one);
        // Another client is refused too, at HELLO: the budget is the broker's.
        let o = Arc::new(Outbox::new(BacklogLimits::default()));
        let subs = vec!["z".parse().unwrap()];
        let e = core.attach_as(2, o, Identity::default(), subs).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooManySubscriptions);
        // UNSUB gives the room back; leaving gives back all of it.
        core.now(1, cmd("UNSUB a"));
        core.now(1, cmd("SUB k"));
        core.now(1, cmd("PUB k hi"));
        assert_eq!(lines(&a), ["MSG k hi"]);
        core.detach(1);
        assert_eq!(core.counters.memory.held(), 0);
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
